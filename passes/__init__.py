"""gradq's graph passes: annotate (policy), rewrite (Dynamo graph), lower (joint graph)."""
