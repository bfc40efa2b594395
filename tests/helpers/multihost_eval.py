"""Child of test_multihost.py: the held-out evaluation of the micro pipeline's policies, on one
process or as one of two (gloo collectives over localhost).

    multihost_eval.py RUN_DIR [PORT PROCESS_ID]

Prints one JSON line with three evaluations: PPO against the SFT reference, best-of-4 reranked by
the RM, and SFT alone; the batch sizes leave a partial last batch in each.
"""

import json
import sys

import ml_collections

from gptjax import sharding as shd


def main():
  run = sys.argv[1]
  if len(sys.argv) > 2:
    shd.init_distributed(ml_collections.ConfigDict(dict(
        coordinator_address=f"127.0.0.1:{sys.argv[2]}", num_processes=2,
        process_id=int(sys.argv[3]), cpu_collectives="gloo", auto=False)))
  from gptjax import checkpoint, evaluation, reward_model
  from gptjax.rl import rollout
  sft, ppo = (checkpoint.load_for_inference(f"{run}/{s}")[:3] for s in ("sft", "ppo"))
  prompts = [[{"role": "user", "content": t}] for t in
             ("Good morrow.", "What say you?", "Away!", "I love thee.", "Speak.", "Fie!")] * 4
  scorer = rollout.TokenScorer(reward_model.load_reward_model(f"{run}/reward"))
  kw = dict(prompts=prompts, max_new_tokens=8)
  out = [evaluation.evaluate_policy(ppo, reference=sft, batch_size=10, **kw),
         evaluation.evaluate_policy(sft, scorer=scorer, best_of=4, batch_size=10, **kw),
         evaluation.evaluate_policy(sft, batch_size=7, **kw)]
  print("RESULT " + json.dumps(out, sort_keys=True, default=float), flush=True)


if __name__ == "__main__":
  main()
