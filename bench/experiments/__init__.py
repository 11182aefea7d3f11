"""One-off measurements behind figures and constants fxq cites; README.md here says what each showed."""
