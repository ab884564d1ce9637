"""Global neural forecasters (RNN, LSTM, GRU, TCN, Transformer) as sktime estimators."""

from forecaster.estimators import (
    GRUForecaster,
    LSTMForecaster,
    NeuralForecaster,
    RNNForecaster,
    TCNForecaster,
    TransformerForecaster,
)

__all__ = [
    "GRUForecaster",
    "LSTMForecaster",
    "NeuralForecaster",
    "RNNForecaster",
    "TCNForecaster",
    "TransformerForecaster",
]
