"""dpo-ray: DPO at cluster scale on Ray."""

__version__ = "0.1.0"
