"""Data-using covariance methods (being written: RegMean, Fisher)."""
