// Links dcpp::torch from the installed package: a libtorch module saved and loaded back.
#include <torch/nn/modules/linear.h>

#include <cstdio>

#include "dcpp/libtorch.h"

int main(int argc, char** argv) {
  if (argc != 2) return 2;
  torch::nn::Linear a(3, 2), b(3, 2);
  if (!dcpp::libtorch::Save(*a, nullptr, argv[1]).ok()) return 1;
  if (!dcpp::libtorch::Load(*b, nullptr, argv[1]).ok()) return 1;
  if (!torch::equal(a->weight, b->weight) || !torch::equal(a->bias, b->bias)) return 1;
  std::printf("consumer_torch: module round-trips\n");
  return 0;
}
