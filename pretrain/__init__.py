"""SSL-HSIC pretraining (Li et al., NeurIPS 2021). Light to import: heavy stacks load where they
are used."""

from common import __version__  # noqa: F401 (the distribution's version, one place)
