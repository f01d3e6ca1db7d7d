"""TFDS builders of this project; importing this package registers them.

Registered names: `office31`, `office_home` (manual download), `digits`, `digits_m` (generated, the
embedded default benchmark) and `domain_folder` (the config-driven custom dataset). `catalog` maps a
data config (config_defaults.get_data_config) to builders, splits and class names.
"""

from dsbn_jax.datasets.catalog import (
  DataInfo,
  DomainInfo,
  get_builder,
  get_data_info,
  resolve_domain,
  valid_domains,
)
from dsbn_jax.datasets.custom import DomainFolder, DomainFolderConfig
from dsbn_jax.datasets.digits import Digits, DigitsConfig, DigitsM
from dsbn_jax.datasets.office import Office31, OfficeHome
