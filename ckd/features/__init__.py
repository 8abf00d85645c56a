"""Feature-level distillation: trainable modules and eager references (CRD, TeKAP (F),
SDKD); their registry declarations live in `ckd.methods`."""
