"""Stage `autoencoder`: fine-tune the VAE (decoder or full) with a PatchGAN discriminator."""

# The modules that decide what the stage's result is (tuneline.core.codeversion).
CODE = ("stages/autoencoder/stage.py", "stages/autoencoder/data.py", "stages/autoencoder/evaluate.py",
        "models/autoencoder.py", "train/trainer.py")
