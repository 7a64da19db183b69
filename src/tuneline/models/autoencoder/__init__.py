"""The autoencoder kind (beside the diffusion families): a KL VAE fine-tuned with a PatchGAN
discriminator by the `autoencoder` stage. `adapter` holds its trainer adapter."""

ADAPTER = "tuneline.models.autoencoder.adapter:AutoencoderAdapter"
