"""Configuration: the experiment and pretraining schemas, and registry names that import nothing heavy."""
