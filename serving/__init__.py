"""The Ray Serve application: the OpenAI-compatible routing gateway and its model targets."""
