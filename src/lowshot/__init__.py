"""lowshot: self-supervised pretraining, probing, fine-tuning and honest evaluation for small
medical image data sets."""

__version__ = "0.1.0"
