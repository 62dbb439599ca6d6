//! Cross-checks against rumqttc (an independent implementation).
