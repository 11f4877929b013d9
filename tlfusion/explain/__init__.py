"""Explanations for review: Grad-CAM of the selected model and of each backbone, LIME on the whole bundle, and an
HTML gallery of them (`explain.cases.explain_cases` is the one call the command line and the pipeline need)."""
