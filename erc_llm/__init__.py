"""erc-llm: emotion recognition in conversation with a small LLM."""

import logging
import warnings

# Two third-party messages that say nothing true about a user's run: bitsandbytes looks up an optional 4-bit CPU
# kernel on a hub at import time (peft imports it whenever it is installed; QLoRA falls back and says so itself),
# and peft's PeftModel reads transformers' deprecated ``is_gradient_checkpointing``. `-v` shows library logs.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
