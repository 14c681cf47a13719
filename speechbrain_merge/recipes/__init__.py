"""SpeechBrain recipes (a Brain subclass and its hparams each) used by the tests and demos."""
