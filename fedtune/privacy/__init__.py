"""Differential privacy: secure Gaussian noise, opacus accounting, DP-SGD (see docs/privacy.md)."""

from fedtune.privacy.accountant import ACCOUNTANTS, PrivacyLedger, noise_multiplier_for
from fedtune.privacy.noise import SecureGaussian

__all__ = ["ACCOUNTANTS", "PrivacyLedger", "SecureGaussian", "noise_multiplier_for"]
