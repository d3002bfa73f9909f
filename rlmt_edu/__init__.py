"""rlmt_edu: every equation of *Understanding Reinforcement Learning for Model Training* (Patel, 2025,
arXiv 2509.04501) as a small, tested function, and tiny GPTs that train with them on a CPU."""

__version__ = "0.1.0"
