"""NormProp Stream: the online-learning service around the `normprop` library."""
