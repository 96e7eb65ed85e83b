#pragma once
// stage_costs: a partition of a transformer turned into what each virtual stage costs per
// microbatch — the work of its F, B and W passes, the activation bytes its F stores and which of
// them B and W free, its transient working memory, its parameters — and what each rank carries on
// top under vocabulary parallelism.
//
// Vocabulary parallelism (partition::vocab_parallel): the embedding and the output layer are
// sharded over all p ranks. Until the executor runs their S/T (and IF/IB) passes as actions of
// their own, their work is modelled as equal extra work in every rank's stage passes — S and IF
// in F, the ∇X part of T in B, the rest of T and IB in W, split evenly over the rank's chunks —
// and their memory as the paper describes it (Yeung et al., MLSys 2025; reference notes,
// vocabulary_parallelism.md §9.1): each communication barrier keeps one more microbatch of every
// rank's activations in flight (p + 1 on rank 0 for one barrier, p + 2 for two), and each rank
// keeps its fp32 softmax shard and the broadcast input for each S/T pair in flight: one per
// barrier, since T(k − 1) runs right before S(k) (ibid.).
//
// With tensor parallelism (tensor_parallel.hpp) every number is one rank's of the group: the
// layers' work, activations and parameters split as Megatron splits them, the LM head and the
// embedding over the vocabulary; under vocabulary parallelism the vocabulary is sharded over the
// pipeline × tensor ranks (p·t shards).

#include <algorithm>
#include <cstddef>
#include <vector>

#include "pipit/core/error.hpp"
#include "pipit/cost/flops.hpp"
#include "pipit/cost/memory.hpp"
#include "pipit/cost/tensor_parallel.hpp"
#include "pipit/cost/transformer.hpp"
#include "pipit/cost/vocab_algorithm.hpp"
#include "pipit/cost/work.hpp"
#include "pipit/partition/partition.hpp"

namespace pipit::cost {

struct stage_cost {
  pass_work work{};              // one microbatch's F, B and W through this virtual stage
  double activation_bytes = 0;   // stored by its F for one microbatch
  double weight_grad_bytes = 0;  // of those, kept until W (B frees the rest)
  double workspace_bytes = 0;    // transient while its passes run
  double parameters = 0;         // parameters it holds

  // The fraction of activation_bytes the B pass frees (the simulator's free_at_b).
  constexpr double free_at_b() const noexcept {
    return activation_bytes > 0 ? 1 - weight_grad_bytes / activation_bytes : 0;
  }
};

struct rank_cost {
  double parameters = 0;       // all of the rank's stages, vocabulary shards included
  double workspace_bytes = 0;  // the largest transient of any of its passes
  // Activation bytes beyond what the simulated plan keeps in flight: under vocabulary
  // parallelism, barriers × the rank's activations of one microbatch, plus the S/T pairs' softmax
  // shards and inputs.
  double extra_activation_bytes = 0;
};

struct model_costs {
  std::vector<stage_cost> stages;  // per virtual stage, pipeline order
  std::vector<rank_cost> ranks;    // per rank
  bool vocab_parallel = false;
  int barriers = 0;             // vocabulary barriers (0 unless vocab_parallel)
  vocab_parallel_work vocab{};  // one rank's share of the vocabulary layers (vocab_parallel)
};

// Throws pipit::error when the partition does not fit the model (layer count) or the tensor
// parallel size does not split it.
inline model_costs stage_costs(const transformer& t, const partition::partition& part,
                               vocab_algorithm alg, const tensor_parallel& tp) {
  check(t);
  check(part);
  check(tp, t);
  if (part.layer_count() != t.layers)
    fail("pipit: the partition holds ", part.layer_count(),
         " transformer layers but the model has ", t.layers,
         " (layout: ", partition::to_layout(part), ")");
  const int p = part.pipe.ranks, v = part.pipe.chunks;
  model_costs mc;
  mc.vocab_parallel = part.vocab_parallel;
  mc.stages.resize(static_cast<std::size_t>(part.virtual_stages()));
  mc.ranks.resize(static_cast<std::size_t>(p));

  const pass_work layer = layer_work(t, tp);
  for (int s = 0; s < part.virtual_stages(); ++s) {
    const auto& st = part.stages[static_cast<std::size_t>(s)];
    stage_cost& c = mc.stages[static_cast<std::size_t>(s)];
    c.work = layer * st.layers;
    c.activation_bytes = st.layers * layer_activation_bytes(t, tp);
    c.weight_grad_bytes = st.layers * layer_weight_grad_bytes(t, tp);
    c.workspace_bytes = st.layers > 0 ? layer_workspace_bytes(t, tp) : 0;
    c.parameters = st.layers * layer_parameters(t, tp);
    if (st.embedding) {
      c.work += embedding_work(t);
      c.parameters += embedding_parameters(t, tp);
    }
    if (st.output) {
      const double rows = vocab_entries(t, tp);
      c.work += output_work(t, tp);
      c.activation_bytes += output_activation_bytes(t, rows);
      c.weight_grad_bytes += output_weight_grad_bytes(t, rows);
      c.workspace_bytes = std::max(c.workspace_bytes, output_workspace_bytes(t, rows));
      c.parameters += output_parameters(t, tp);
    }
  }

  if (part.vocab_parallel) {
    mc.barriers = barriers(alg);
    const int shards = p * tp.size;
    mc.vocab = vocab_work(t, shards, alg);
    const double shard = vocab_shard(t, shards), n = t.tokens(), x = t.bytes.activation;
    // Each chunk of a rank takes 1/v of the rank's share.
    pass_work share;
    share.f = mc.vocab.s + mc.vocab.input_f;
    share.b = mc.vocab.t_input;
    share.w = work{mc.vocab.t.gemm_flops - mc.vocab.t_input.gemm_flops,
                   mc.vocab.t.attention_flops - mc.vocab.t_input.attention_flops,
                   mc.vocab.t.memory_bytes - mc.vocab.t_input.memory_bytes} +
              mc.vocab.input_b;
    share = share * (1.0 / v);
    for (auto& c : mc.stages) c.work += share;
    // The final norm stays with the last transformer stage; positions with the first.
    stage_cost& last = mc.stages.back();
    last.work.f.memory_bytes += n * 2 * x * t.hidden;
    last.work.b.memory_bytes += n * 3 * x * t.hidden;
    last.parameters += 2.0 * t.hidden;
    if (t.learned_positions) mc.stages.front().parameters += double(t.seq) * t.hidden;
    const double shard_parameters = 2 * shard * t.hidden;  // embedding rows + LM head rows
    const double pairs = mc.barriers;
    const double pair_bytes = t.ce.saved_bytes * n * shard + 4.0 * n * (t.hidden + 1);
    for (int r = 0; r < p; ++r) {
      rank_cost& rc = mc.ranks[static_cast<std::size_t>(r)];
      double per_microbatch = 0;
      for (const int s : part.stages_of(r))
        per_microbatch += mc.stages[static_cast<std::size_t>(s)].activation_bytes;
      rc.parameters += shard_parameters;
      rc.extra_activation_bytes = mc.barriers * per_microbatch + pairs * pair_bytes;
      rc.workspace_bytes = output_workspace_bytes(t, shard);
    }
  }

  for (int s = 0; s < part.virtual_stages(); ++s) {
    rank_cost& rc = mc.ranks[static_cast<std::size_t>(part.rank_of(s))];
    const stage_cost& c = mc.stages[static_cast<std::size_t>(s)];
    rc.parameters += c.parameters;
    rc.workspace_bytes = std::max(rc.workspace_bytes, c.workspace_bytes);
  }
  return mc;
}

inline model_costs stage_costs(const transformer& t, const partition::partition& part,
                               vocab_algorithm alg = vocab_algorithm::one_barrier) {
  return stage_costs(t, part, alg, tensor_parallel{});
}

}  // namespace pipit::cost
