"""TFDS builders of this project; importing this package registers them.

Registered names: `office31`, `office_home` (manual download), `digits`, `digits_m` (generated, the
embedded default benchmark) and `domain_folder` (the config-driven custom dataset). `catalog` maps a
data config (configs/data.py) to builders, splits and class names.
"""

from dsbn_jax.datasets.catalog import DataInfo
from dsbn_jax.datasets.catalog import DomainInfo
from dsbn_jax.datasets.catalog import get_builder
from dsbn_jax.datasets.catalog import get_data_info
from dsbn_jax.datasets.catalog import resolve_domain
from dsbn_jax.datasets.catalog import valid_domains
from dsbn_jax.datasets.digits import Digits
from dsbn_jax.datasets.digits import DigitsConfig
from dsbn_jax.datasets.digits import DigitsM
from dsbn_jax.datasets.folder import DomainFolder
from dsbn_jax.datasets.folder import DomainFolderConfig
from dsbn_jax.datasets.office import Office31
from dsbn_jax.datasets.office import OfficeHome
