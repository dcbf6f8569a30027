"""One module per method; importing this package registers them all (see `lorakit.methods()`)."""

from . import lora, lora_ga, lora_sb, lora_xs, olora, pissa  # noqa: F401
