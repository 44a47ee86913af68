"""The library messages that every launch printed and that ask nothing of the user, silenced
in one place. Each entry says why it is harmless here; anything a user may have to act on
(a broken checkpoint's load report, a real error) still shows.

Loaded by the entry scripts only (utils/__init__.py imports it when the package runs as the
scripts' `utils`), early: before DeepSpeed is imported, so its import-time message is caught.
The installed library (`exo_align`) leaves every warning filter alone.
"""
import logging
import os
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, *starts):
        super().__init__()
        self.starts = starts

    def filter(self, record):
        return not record.getMessage().startswith(self.starts)


# DeepSpeed logs "Setting accelerator to CPU ..." on import in every process when it finds no
# GPU. Under a launcher (RANK is set) the launcher's own processes have just said so, and on
# CPU ranks it is the device the launcher chose; a plain one-process run still says it once.
if "RANK" in os.environ:
    logging.getLogger("DeepSpeed").addFilter(_DropMessages("Setting accelerator to CPU"))

# The other ranks draw the same library progress bars as rank 0 (loading weights, writing the
# export's shards, datasets' map); rank 0's show the progress. Read when those libraries load.
if os.environ.get("RANK", "0") != "0":
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow it
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

# torch deprecates the names DeepSpeed's ZeRO collectives call; they work, and the fix is DeepSpeed's.
warnings.filterwarnings("ignore", category=FutureWarning,
                        message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
# peft asks transformers whether checkpointing is on by the old name; the fix is peft's.
warnings.filterwarnings("ignore", category=FutureWarning, message=r"`is_gradient_checkpointing` is deprecated")
# LoRA on GPT-2's Conv1D layers: peft sets fan_in_fan_out itself, and the export's LoRA merge
# (model_utils._merge_lora) reads the flag peft set.
warnings.filterwarnings("ignore", category=UserWarning,
                        message=r"fan_in_fan_out is set to False but the target module is `Conv1D`")
# Every forward and generate call of this code passes an attention mask; transformers warns when
# one of its own inner calls has none although the inputs hold pad ids (pad = EOS in most models).
logging.getLogger("transformers.modeling_utils").addFilter(
    _DropMessages("We strongly recommend passing in an `attention_mask`"))
