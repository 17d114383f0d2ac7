"""Released weights of the model families: import them as our exports, and start training stages from them."""
from pipeline.weights.release import (get_format, import_weights, prepare_init, read_tensors,
                                      release_state_of_export, to_ours, to_release_state)

__all__ = ["get_format", "import_weights", "prepare_init", "read_tensors", "release_state_of_export",
           "to_ours", "to_release_state"]
