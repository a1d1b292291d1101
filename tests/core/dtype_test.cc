// Element type conversions.
#include "core/dtype.h"

#include <cmath>
#include <cstring>

#include "gtest/gtest.h"

namespace switchyard {
namespace {

TEST(DTypeTest, Bf16RoundTripsAndRoundsToNearestEven) {
  for (float f : {0.0f, 1.0f, -2.5f, 3.140625f, 0x1p-100f, 65280.0f}) {  // exact in bf16
    EXPECT_EQ(Bf16ToF32(F32ToBf16(f)), f) << f;
  }
  // 1 + 2^-8 is exactly halfway between two bf16 values: ties to even (1.0).
  EXPECT_EQ(Bf16ToF32(F32ToBf16(1.0f + 1.0f / 256)), 1.0f);
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(NAN))));
}

TEST(DTypeTest, F16RoundTripsIncludingSubnormalsAndInf) {
  for (float f : {0.0f, 1.0f, -2.5f, 65504.0f, 6.103515625e-05f, 5.9604645e-08f, 0.333251953125f}) {
    EXPECT_EQ(F16ToF32(F32ToF16(f)), f) << f;
  }
  EXPECT_TRUE(std::isinf(F16ToF32(F32ToF16(1e6f))));
  EXPECT_EQ(F32ToF16(1.0f), 0x3c00);
  EXPECT_EQ(F16ToF32(0xc000), -2.0f);
}

TEST(DTypeTest, ParseNamesUnsupported) {
  EXPECT_EQ(*ParseDType("BF16"), DType::kBF16);
  auto bad = ParseDType("F8_E4M3");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("F8_E4M3"), std::string::npos);
}

}  // namespace
}  // namespace switchyard
