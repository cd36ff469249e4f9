"""d2v-shard: turn image folders, audio collections and text corpora into WebDataset shards."""
