import sys

from portainer_agent.cli import main

sys.exit(main())
