#pragma once
// balanced_partition: partition::balanced with the items' costs from the cost model — the time
// of one microbatch's F + B + W through the input embedding, one transformer layer and the output
// layer on the given hardware. The vocabulary layers are counted at their real cost, which is
// what makes the end stages light: at V = 256k the output layer alone outweighs several layers.

#include "pipit/cost/flops.hpp"
#include "pipit/cost/hardware.hpp"
#include "pipit/cost/transformer.hpp"
#include "pipit/partition/balanced.hpp"
#include "pipit/partition/partition.hpp"

namespace pipit::cost {

// Seconds of one microbatch's F + B + W through each kind of item.
struct item_seconds {
  double embedding = 0;
  double layer = 0;
  double output = 0;
};

inline item_seconds item_costs(const transformer& t, const hardware& hw) {
  check(t);
  check(hw);
  return {seconds(embedding_work(t).total(), hw), seconds(layer_work(t).total(), hw),
          seconds(output_work(t).total(), hw)};
}

inline partition::partition balanced_partition(const transformer& t, const hardware& hw,
                                               const partition::pipeline& pl) {
  const item_seconds c = item_costs(t, hw);
  return partition::balanced(t.layers, c.embedding, c.layer, c.output, pl);
}

}  // namespace pipit::cost
