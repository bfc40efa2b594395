"""Tasks with checkable answers: each is a data source (problems, SFT chats, RL prompts) plus a
reward function (a verifier), so any objective can train on it by configuration."""
