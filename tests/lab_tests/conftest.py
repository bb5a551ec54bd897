from tests.lab.fixtures import lab, lab_sweep

__all__ = ["lab", "lab_sweep"]
