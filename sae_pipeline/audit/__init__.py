"""The adversarial audit (issue #7): a hash-locked suite of attack families and shifted benign traffic, run on the
steered model under the frozen, redacting harness, with per-locale alpha multipliers."""
