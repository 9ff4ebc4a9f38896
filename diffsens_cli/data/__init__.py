"""Image data sets (embedded stand-ins and published files) and perturbation sets S."""

from diffsens_cli.data.base import ImageSet
from diffsens_cli.data.load import IMAGE_DATASETS, check_images, data_depends, load_images
from diffsens_cli.data.subsets import check_perturbation_set, perturbation_set

__all__ = ["IMAGE_DATASETS", "ImageSet", "check_images", "check_perturbation_set", "data_depends", "load_images",
           "perturbation_set"]
