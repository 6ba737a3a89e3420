"""SSL-HSIC pretraining (Li et al., NeurIPS 2021). Light to import: heavy stacks load where they are used."""
__version__ = "0.1.0"
