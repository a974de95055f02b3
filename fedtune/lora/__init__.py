"""LoRA-based federated tuning: the LoRA-FedAvg (FedIT) baseline."""

from fedtune.lora.fedit import AdapterArrays, adapter_arrays, add_lora, load_adapter_arrays, train_local

__all__ = ["AdapterArrays", "adapter_arrays", "add_lora", "load_adapter_arrays", "train_local"]
