import sys

from voicebridge.sim.fake_openai.server import main

sys.exit(main())
