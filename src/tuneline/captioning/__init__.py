"""Captioning helpers of the `caption` stage: caption text rules, and the Florence-2 runner."""
