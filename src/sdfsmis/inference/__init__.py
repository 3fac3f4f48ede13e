"""Inference pieces shared by ``predict``, ``evaluate``, ``demo`` and the baseline: the slice axis
(:mod:`.geometry`), the slice pipeline (:mod:`.slices`) and the 3-D clean-up (:mod:`.cleanup`)."""
