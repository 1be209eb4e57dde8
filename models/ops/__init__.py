"""Operations with several implementations (selective scan, deformable sequence, adaptive sampling)."""
