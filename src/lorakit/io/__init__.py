"""Persistence (safetensors + JSON) and PEFT export."""
