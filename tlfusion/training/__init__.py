"""Training backbones: fine-tuning and its loop, records, pretraining, distribution, provenance, model cards."""
