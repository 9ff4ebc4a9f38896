"""Image data sets (embedded stand-ins and published files) and perturbation sets S."""

from diffsens_cli.data.base import ImageSet
from diffsens_cli.data.load import IMAGE_DATASETS, load_images
from diffsens_cli.data.subsets import perturbation_set

__all__ = ["IMAGE_DATASETS", "ImageSet", "load_images", "perturbation_set"]
