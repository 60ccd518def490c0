"""Simulators of both ends: a fake OpenAI Realtime GA server and a simulated VoiceAI Connect caller."""
