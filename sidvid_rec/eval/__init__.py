"""Full-ranking evaluation: ranks of the target item -> HR@K, NDCG@K, MRR."""
