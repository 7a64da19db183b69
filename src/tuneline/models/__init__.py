"""Model families: loading components (VAE, text encoders) and the family-specific math the stages share."""
