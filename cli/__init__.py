"""The ``forecaster`` command line: the one package above ``forecaster``, ``pipelines`` and
``serving`` that may import all three."""
