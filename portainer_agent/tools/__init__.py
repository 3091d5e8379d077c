"""Small command-line tools that talk to an agent the way Portainer does."""
