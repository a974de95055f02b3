"""Split-and-privatize LoRA (SAP; Shen et al. 2023, arXiv:2312.15603): see docs/sap.md."""
