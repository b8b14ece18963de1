"""The frozen base (classifiers, causal LMs), what is adapted (the adapter spec), the stacked
LoRA layers, other PEFT methods, dropout, and export in PEFT format."""
