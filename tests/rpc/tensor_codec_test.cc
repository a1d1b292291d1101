// rpc/tensor_codec.h: the wire form of activations. BF16 encoding is
// bitwise F32ToBf16 of every value (round to nearest even), across the
// encoder's chunk boundaries and into a reused message; F32 is exact; every
// malformed tensor is refused by name.
#include "rpc/tensor_codec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace switchyard::rpc {
namespace {

using ::testing::HasSubstr;

// Random rows with the values that round awkwardly mixed in.
std::vector<float> Rows(int64_t n, int64_t d, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  std::vector<float> x(static_cast<size_t>(n * d));
  for (float& v : x) v = normal(rng);
  const float awkward[] = {0.0f,
                           -0.0f,
                           std::numeric_limits<float>::denorm_min(),
                           std::numeric_limits<float>::max(),
                           -std::numeric_limits<float>::infinity(),
                           std::numeric_limits<float>::quiet_NaN(),
                           1.00390625f,   // a tie: 1 + 2^-8, rounds to even
                           1.01171875f};  // a tie that rounds up
  for (size_t i = 0; i < x.size(); i += 97) x[i] = awkward[(i / 97) % std::size(awkward)];
  return x;
}

TEST(TensorCodecTest, Bf16IsF32ToBf16OfEveryValueAcrossChunkBoundaries) {
  // The encoder rounds 2048 values at a time: counts below, at and around it.
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {1, 1}, {1, 2047}, {1, 2048}, {1, 2049}, {3, 683}, {5, 4096}, {256, 64}, {7, 4099}};
  double max_rel = 0;  // over the normal values
  for (const auto& [n, d] : shapes) {
    SCOPED_TRACE(testing::Message() << "[" << n << ", " << d << "]");
    const std::vector<float> x = Rows(n, d, static_cast<uint32_t>(n * 31 + d));
    v1::Tensor tensor;
    EncodeMatrix(x.data(), n, d, v1::DTYPE_BF16, &tensor);
    EXPECT_EQ(tensor.dtype(), v1::DTYPE_BF16);
    ASSERT_EQ(tensor.shape_size(), 2);
    EXPECT_EQ(tensor.shape(0), n);
    EXPECT_EQ(tensor.shape(1), d);
    ASSERT_EQ(tensor.data().size(), x.size() * 2);
    int mismatches = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      uint16_t got;
      std::memcpy(&got, tensor.data().data() + 2 * i, 2);
      mismatches += got != F32ToBf16(x[i]);
    }
    EXPECT_EQ(mismatches, 0);
    absl::StatusOr<std::vector<float>> back = DecodeMatrix(tensor, d, "x");
    ASSERT_TRUE(back.ok()) << back.status();
    for (size_t i = 0; i < x.size(); ++i) {
      const float want = Bf16ToF32(F32ToBf16(x[i]));
      if (std::isnan(want)) {
        EXPECT_TRUE(std::isnan((*back)[i]));
      } else {
        EXPECT_EQ((*back)[i], want) << i;
        if (std::isfinite(want) && std::abs(x[i]) >= std::numeric_limits<float>::min()) {
          max_rel = std::max<double>(max_rel, std::abs((*back)[i] - x[i]) / std::abs(x[i]));
        }
      }
    }
  }
  // BF16 keeps 8 significant bits, so rounding to nearest is off by at most
  // half a unit in the last place: 2^-8 relative.
  std::printf("[ bf16     ] max |decoded - x| / |x| %.6g (bound 2^-8 = %.6g)\n", max_rel,
              1.0 / 256);
  EXPECT_LE(max_rel, 1.0 / 256);
}

TEST(TensorCodecTest, EncodingIntoAUsedTensorLeavesNothingOfItsOldContents) {
  const std::vector<float> big = Rows(9, 4096, 1);
  const std::vector<float> small = Rows(2, 5, 2);
  for (v1::DType dtype : {v1::DTYPE_BF16, v1::DTYPE_F32}) {
    v1::Tensor tensor;
    EncodeMatrix(big.data(), 9, 4096, dtype, &tensor);
    EncodeMatrix(small.data(), 2, 5, dtype, &tensor);
    v1::Tensor fresh;
    EncodeMatrix(small.data(), 2, 5, dtype, &fresh);
    EXPECT_EQ(tensor.SerializeAsString(), fresh.SerializeAsString()) << v1::DType_Name(dtype);
  }
}

TEST(TensorCodecTest, F32RoundTripsExactlyIntoTheCallersBuffer) {
  const std::vector<float> x = Rows(4, 33, 3);
  v1::Tensor tensor;
  EncodeMatrix(x.data(), 4, 33, v1::DTYPE_F32, &tensor);
  std::vector<float> out(x.size(), -1.0f);
  ASSERT_TRUE(DecodeMatrixInto(tensor, 33, 4, out.data(), "x").ok());
  EXPECT_EQ(std::memcmp(out.data(), x.data(), x.size() * sizeof(float)), 0);
}

TEST(TensorCodecTest, MalformedTensorsAreRefusedByName) {
  const std::vector<float> x = Rows(3, 8, 4);
  v1::Tensor good;
  EncodeMatrix(x.data(), 3, 8, v1::DTYPE_BF16, &good);
  const auto refused = [](const v1::Tensor& t, int64_t d, int64_t rows) {
    std::vector<float> out(static_cast<size_t>(rows * d));
    return DecodeMatrixInto(t, d, rows, out.data(), "hidden_states");
  };
  struct Case {
    const char* name;
    v1::Tensor tensor;
    int64_t d, rows;
    const char* says;
  };
  std::vector<Case> cases;
  cases.push_back({"wrong width", good, 9, 3, "expected shape [N >= 1, 9]"});
  cases.push_back({"wrong rows", good, 8, 4, "3 rows, expected 4"});
  {
    v1::Tensor t = good;
    t.add_shape(1);
    cases.push_back({"rank 3", t, 8, 3, "got rank 3"});
  }
  {
    v1::Tensor t = good;
    t.mutable_data()->pop_back();
    cases.push_back({"short data", t, 8, 3, "47 data bytes, expected 48"});
  }
  {
    v1::Tensor t = good;
    t.set_shape(0, 1000);  // a shape its data does not fill
    cases.push_back({"lying shape", t, 8, 1000, "48 data bytes, expected 16000"});
  }
  {
    v1::Tensor t = good;
    t.set_dtype(v1::DTYPE_UNSPECIFIED);
    cases.push_back({"no dtype", t, 8, 3, "unsupported dtype"});
  }
  for (const Case& c : cases) {
    const absl::Status s = refused(c.tensor, c.d, c.rows);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.name << ": " << s;
    EXPECT_THAT(s.message(), HasSubstr("hidden_states")) << c.name;
    EXPECT_THAT(s.message(), HasSubstr(c.says)) << c.name;
  }
}

// For a version 2 frame: rows encoded at an offset of a frame's tail (odd
// offsets: the tail need not be aligned) are the bytes EncodeMatrix puts in
// `data`, and decode to the same values; a tensor that points into a tail it
// does not fit in, that has data too, or that comes without a tail is
// refused by name.
TEST(TensorCodecTest, RowsInAFrameTailAreTheBytesOfData) {
  for (const v1::DType dtype : {v1::DTYPE_F32, v1::DTYPE_BF16}) {
    for (const auto& [n, d] : std::vector<std::pair<int64_t, int64_t>>{{1, 5}, {3, 2049}}) {
      SCOPED_TRACE(testing::Message() << v1::DType_Name(dtype) << " [" << n << ", " << d << "]");
      const std::vector<float> x = Rows(n, d, static_cast<uint32_t>(n * 7 + d));
      v1::Tensor in_data;
      EncodeMatrix(x.data(), n, d, dtype, &in_data);
      const size_t bytes = EncodedMatrixBytes(n, d, dtype);
      ASSERT_EQ(bytes, in_data.data().size());
      constexpr size_t kOffset = 3;
      std::string tail(kOffset + bytes + 5, '\x7f');
      v1::Tensor in_tail;
      in_tail.set_data("stale");  // cleared: the rows are in the tail
      DescribeMatrixInFrameTail(n, d, dtype, kOffset, &in_tail);
      EncodeMatrixTo(x.data(), n, d, dtype, tail.data() + kOffset);
      EXPECT_TRUE(in_tail.data().empty());
      EXPECT_EQ(in_tail.dtype(), in_data.dtype());
      EXPECT_EQ(tail.substr(kOffset, bytes), in_data.data());
      std::vector<float> from_data(x.size()), from_tail(x.size());
      ASSERT_TRUE(DecodeMatrixInto(in_data, d, n, from_data.data(), "x").ok());
      const absl::Status s = DecodeMatrixInto(in_tail, d, n, from_tail.data(), "x", tail);
      ASSERT_TRUE(s.ok()) << s;
      EXPECT_EQ(std::memcmp(from_data.data(), from_tail.data(), x.size() * sizeof(float)), 0);

      const auto refused = [&](const v1::Tensor& t, std::optional<std::string_view> frame_tail) {
        return DecodeMatrixInto(t, d, n, from_tail.data(), "x", frame_tail);
      };
      EXPECT_THAT(refused(in_tail, std::nullopt).message(),
                  HasSubstr("x: frame_tail_offset is set, but the tensor did not come in a "
                            "version 2 frame"));
      const std::string_view short_tail(tail.data(), kOffset + bytes - 1);
      EXPECT_THAT(refused(in_tail, short_tail).message(),
                  HasSubstr(absl::StrCat(bytes,
                                         " data bytes at frame tail offset 3 (and 0 in "
                                         "data), but the frame's tail has ",
                                         short_tail.size())));
      v1::Tensor far = in_tail;
      far.set_frame_tail_offset(std::numeric_limits<uint64_t>::max());  // no wrap-around
      EXPECT_EQ(refused(far, tail).code(), absl::StatusCode::kInvalidArgument);
      v1::Tensor both = in_tail;
      both.set_data(in_data.data());
      EXPECT_EQ(refused(both, tail).code(), absl::StatusCode::kInvalidArgument);
      // A tail where the tensor has its data in `data`: the tail is not used.
      ASSERT_TRUE(DecodeMatrixInto(in_data, d, n, from_tail.data(), "x", "").ok());
    }
  }
}

}  // namespace
}  // namespace switchyard::rpc
