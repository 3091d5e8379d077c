import sys

from portainer_agent.lab.cli import main

sys.exit(main())
