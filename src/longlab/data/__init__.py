"""Text and synthetic data shared by evaluation and training: the standard-library corpus, the
synthetic long-context generators (passkey, needles, haystacks). Imports nothing above it."""
