"""This project's experiments: the trainer, the lottery-ticket and ResNet pipelines, their configurations, the
scripts' command line, folder locks, logs and plots. They use the library (`gsm`); the library never imports
them."""
