"""TFDS builders for Office-31 (`office31`) and Office-Home (`office_home`), manual download.

Label order is the **sorted class folder names** (Python `sorted`, so upper case sorts first: 'TV'
before 'Table'). For Office-31 that is the ALDA list order (back_pack=0 ... trash_can=30,
docs/reference.md §6).
For Office-Home the ALDA/CDAN lists use a non-alphabetical order (Drill=0, Exit_Sign=1, ...);
DSBN uses an alphabetical one. The order only has to be consistent between source and target,
which it is, so accuracies are unaffected; map labels by name when comparing with the reference.
"""

from __future__ import annotations

from dsbn_jax.datasets import folder

# Published image counts per domain (lines of the official ALDA lists, docs/reference.md §6).
OFFICE31_COUNTS = {'amazon': 2817, 'dslr': 498, 'webcam': 795}
OFFICE_HOME_COUNTS = {'Art': 2427, 'Clipart': 4365, 'Product': 4439, 'Real_World': 4357}

OFFICE31_CLASSES = (
  'back_pack',
  'bike',
  'bike_helmet',
  'bookcase',
  'bottle',
  'calculator',
  'desk_chair',
  'desk_lamp',
  'desktop_computer',
  'file_cabinet',
  'headphones',
  'keyboard',
  'laptop_computer',
  'letter_tray',
  'mobile_phone',
  'monitor',
  'mouse',
  'mug',
  'paper_notebook',
  'pen',
  'phone',
  'printer',
  'projector',
  'punchers',
  'ring_binder',
  'ruler',
  'scissors',
  'speaker',
  'stapler',
  'tape_dispenser',
  'trash_can',
)

# The 65 Office-Home class folders (the ALDA list's names, docs/reference.md §6), sorted.
OFFICE_HOME_CLASSES = tuple(
  sorted(
    (
      'Drill',
      'Exit_Sign',
      'Bottle',
      'Glasses',
      'Computer',
      'File_Cabinet',
      'Shelf',
      'Toys',
      'Sink',
      'Laptop',
      'Kettle',
      'Folder',
      'Keyboard',
      'Flipflops',
      'Pencil',
      'Bed',
      'Hammer',
      'ToothBrush',
      'Couch',
      'Bike',
      'Postit_Notes',
      'Mug',
      'Webcam',
      'Desk_Lamp',
      'Telephone',
      'Helmet',
      'Mouse',
      'Pen',
      'Monitor',
      'Mop',
      'Sneakers',
      'Notebook',
      'Backpack',
      'Alarm_Clock',
      'Push_Pin',
      'Paper_Clip',
      'Batteries',
      'Radio',
      'Fan',
      'Ruler',
      'Pan',
      'Screwdriver',
      'Trash_Can',
      'Printer',
      'Speaker',
      'Eraser',
      'Bucket',
      'Chair',
      'Calendar',
      'Calculator',
      'Flowers',
      'Lamp_Shade',
      'Spoon',
      'Candles',
      'Clipboards',
      'Scissors',
      'TV',
      'Curtains',
      'Fork',
      'Soda',
      'Table',
      'Knives',
      'Oven',
      'Refrigerator',
      'Marker',
    )
  )
)


class Office31(folder.DomainFolderBuilder):
  """Office-31 (Saenko et al. 2010): amazon / dslr / webcam, 31 classes (sorted folder names)."""

  name = 'office31'
  DOMAINS = {'amazon': 'amazon', 'dslr': 'dslr', 'webcam': 'webcam'}
  DOMAIN_SUBDIR = 'images'  # domain_adaptation_images/<domain>/images/<class>/*.jpg
  CLASS_NAMES = OFFICE31_CLASSES
  PUBLISHED_COUNTS = OFFICE31_COUNTS
  HOMEPAGE = 'https://faculty.cc.gatech.edu/~judy/domainadapt/'
  CITATION = (
    '@inproceedings{saenko2010adapting, title={Adapting visual category models to new '
    'domains}, author={Saenko, Kate and Kulis, Brian and Fritz, Mario and Darrell, '
    'Trevor}, booktitle={ECCV}, year={2010}}'
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download Office-31's domain_adaptation_images.tar.gz (linked from
  https://faculty.cc.gatech.edu/~judy/domainadapt/) and put the archive, or the folder it extracts
  to (amazon/, dslr/, webcam/, each with images/<class>/*.jpg), in the manual directory.
  """


class OfficeHome(folder.DomainFolderBuilder):
  """Office-Home (Venkateswara et al. 2017): Art / Clipart / Product / Real_World, 65 classes.

  The "Real World" folder (with a space, as distributed) is the split `Real_World`.
  """

  name = 'office_home'
  DOMAINS = {'Art': 'Art', 'Clipart': 'Clipart', 'Product': 'Product', 'Real_World': 'Real World'}
  CLASS_NAMES = OFFICE_HOME_CLASSES
  PUBLISHED_COUNTS = OFFICE_HOME_COUNTS
  HOMEPAGE = 'https://www.hemanthdv.org/officeHomeDataset.html'
  CITATION = (
    '@inproceedings{venkateswara2017deep, title={Deep hashing network for unsupervised '
    'domain adaptation}, author={Venkateswara, Hemanth and Eusebio, Jose and '
    'Chakraborty, Shayok and Panchanathan, Sethuraman}, booktitle={CVPR}, year={2017}}'
  )
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download OfficeHomeDataset_10072016.zip from https://www.hemanthdv.org/officeHomeDataset.html and
  put the zip, or the folder it extracts to (Art/, Clipart/, Product/, "Real World"/, each with
  <class>/*.jpg), in the manual directory.
  """
