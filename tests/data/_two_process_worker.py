"""One of two processes of test_pipeline's multi-process test (run as a script)."""
import json
import os
import sys

if __name__ == '__main__':
  out_path, data_dir = sys.argv[1], sys.argv[2]
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from kimi_vl_jax.parallel import distributed
  distributed.initialize()
  import jax
  from _pipeline_data import small_config
  from kimi_vl_jax.data import pipeline
  from kimi_vl_jax.data import tokenizer as tokenizer_lib
  from kimi_vl_jax.parallel import mesh as mesh_lib

  cfg = small_config(f'docs=text:{os.path.join(data_dir, "docs.txt")}')
  tok = tokenizer_lib.train_sentencepiece(4096)
  ds = pipeline.build_dataset(cfg, tokenizer=tok)
  it = iter(ds)
  local = [next(it) for _ in range(3)]
  mesh = mesh_lib.build_mesh(cfg.mesh)
  shapes = []
  for b in pipeline.global_batches(iter(local), mesh):
    shapes.append(list(b['tokens'].shape))
    assert b['patches'].shape[0] == cfg.train.global_batch
  texts = [tok.decode(row[row > 0]) for b in local for row in b['tokens']]
  docs = sorted({int(t.split(' ')[0]) for seg in texts for t in seg.split('doc ')[1:]})
  units = [o for _, o in ds.stream.sources[0].units]
  with open(out_path, 'w') as f:
    json.dump({'process': jax.process_index(), 'count': jax.process_count(),
               'local_rows': int(local[0]['tokens'].shape[0]), 'global_shapes': shapes,
               'docs': docs, 'units': units}, f)
